"""The catalog: what this node holds, kept in an embedded database in the state directory."""
