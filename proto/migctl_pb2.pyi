from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COOPERATIVE: _ClassVar[Mode]
    TRADITIONAL: _ClassVar[Mode]

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    REQUEST: _ClassVar[Phase]
    PRE_COPY: _ClassVar[Phase]
    FREEZE: _ClassVar[Phase]
    FINAL_SYNC: _ClassVar[Phase]
    RESTORE: _ClassVar[Phase]
    ROLLBACK: _ClassVar[Phase]
    PAGE_IN: _ClassVar[Phase]
COOPERATIVE: Mode
TRADITIONAL: Mode
PHASE_UNSPECIFIED: Phase
REQUEST: Phase
PRE_COPY: Phase
FREEZE: Phase
FINAL_SYNC: Phase
RESTORE: Phase
ROLLBACK: Phase
PAGE_IN: Phase

class EventsRequest(_message.Message):
    __slots__ = ("after", "follow")
    AFTER_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    after: str
    follow: bool
    def __init__(self, after: _Optional[str] = ..., follow: _Optional[bool] = ...) -> None: ...

class NodeEvent(_message.Message):
    __slots__ = ("token", "kind", "node", "migration_id", "role", "container", "peer", "state", "phase", "at", "report", "gap")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    GAP_FIELD_NUMBER: _ClassVar[int]
    token: str
    kind: str
    node: str
    migration_id: str
    role: str
    container: str
    peer: str
    state: str
    phase: Phase
    at: float
    report: MigrationReport
    gap: bool
    def __init__(self, token: _Optional[str] = ..., kind: _Optional[str] = ..., node: _Optional[str] = ..., migration_id: _Optional[str] = ..., role: _Optional[str] = ..., container: _Optional[str] = ..., peer: _Optional[str] = ..., state: _Optional[str] = ..., phase: _Optional[_Union[Phase, str]] = ..., at: _Optional[float] = ..., report: _Optional[_Union[MigrationReport, _Mapping]] = ..., gap: _Optional[bool] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("migration_id",)
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    def __init__(self, migration_id: _Optional[str] = ...) -> None: ...

class CancelReply(_message.Message):
    __slots__ = ("outcome", "state")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    outcome: str
    state: str
    def __init__(self, outcome: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class GetNodeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node", "engine_version", "criu_version", "docker_root_dir", "checkpoints_enabled", "staging_free_bytes", "engine_free_bytes", "memory_available_bytes", "load", "checkpoint_method", "no_post_copy", "version", "protocol_version", "no_kept_connections")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CRIU_VERSION_FIELD_NUMBER: _ClassVar[int]
    DOCKER_ROOT_DIR_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_ENABLED_FIELD_NUMBER: _ClassVar[int]
    STAGING_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_METHOD_FIELD_NUMBER: _ClassVar[int]
    NO_POST_COPY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NO_KEPT_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    node: str
    engine_version: str
    criu_version: str
    docker_root_dir: str
    checkpoints_enabled: bool
    staging_free_bytes: int
    engine_free_bytes: int
    memory_available_bytes: int
    load: float
    checkpoint_method: str
    no_post_copy: str
    version: str
    protocol_version: int
    no_kept_connections: str
    def __init__(self, node: _Optional[str] = ..., engine_version: _Optional[str] = ..., criu_version: _Optional[str] = ..., docker_root_dir: _Optional[str] = ..., checkpoints_enabled: _Optional[bool] = ..., staging_free_bytes: _Optional[int] = ..., engine_free_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., load: _Optional[float] = ..., checkpoint_method: _Optional[str] = ..., no_post_copy: _Optional[str] = ..., version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., no_kept_connections: _Optional[str] = ...) -> None: ...

class AuthorizeRequest(_message.Message):
    __slots__ = ("container", "destination_node")
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_NODE_FIELD_NUMBER: _ClassVar[int]
    container: str
    destination_node: str
    def __init__(self, container: _Optional[str] = ..., destination_node: _Optional[str] = ...) -> None: ...

class AuthorizeReply(_message.Message):
    __slots__ = ("migration_id", "container_id", "expires_in")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    container_id: str
    expires_in: float
    def __init__(self, migration_id: _Optional[str] = ..., container_id: _Optional[str] = ..., expires_in: _Optional[float] = ...) -> None: ...

class BeginRequest(_message.Message):
    __slots__ = ("migration_id", "container")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    container: str
    def __init__(self, migration_id: _Optional[str] = ..., container: _Optional[str] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("migration_id",)
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    def __init__(self, migration_id: _Optional[str] = ...) -> None: ...

class CommitReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ContainerRef(_message.Message):
    __slots__ = ("container",)
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    container: str
    def __init__(self, container: _Optional[str] = ...) -> None: ...

class PortBinding(_message.Message):
    __slots__ = ("container_port", "host_ip", "host_port")
    CONTAINER_PORT_FIELD_NUMBER: _ClassVar[int]
    HOST_IP_FIELD_NUMBER: _ClassVar[int]
    HOST_PORT_FIELD_NUMBER: _ClassVar[int]
    container_port: str
    host_ip: str
    host_port: str
    def __init__(self, container_port: _Optional[str] = ..., host_ip: _Optional[str] = ..., host_port: _Optional[str] = ...) -> None: ...

class VolumeSpec(_message.Message):
    __slots__ = ("name", "destination", "read_only", "driver", "labels", "driver_options", "size_bytes", "volume_id")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class DriverOptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DRIVER_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    destination: str
    read_only: bool
    driver: str
    labels: _containers.ScalarMap[str, str]
    driver_options: _containers.ScalarMap[str, str]
    size_bytes: int
    volume_id: str
    def __init__(self, name: _Optional[str] = ..., destination: _Optional[str] = ..., read_only: _Optional[bool] = ..., driver: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., driver_options: _Optional[_Mapping[str, str]] = ..., size_bytes: _Optional[int] = ..., volume_id: _Optional[str] = ...) -> None: ...

class ContainerSpec(_message.Message):
    __slots__ = ("id", "name", "image", "image_id", "image_tags", "diff_ids", "command", "entrypoint", "env", "labels", "working_dir", "user", "hostname", "restart_policy", "ports", "volumes", "networks", "running", "engine_config_json", "memory_bytes", "unsupported", "layer_sizes", "endpoints")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_TAGS_FIELD_NUMBER: _ClassVar[int]
    DIFF_IDS_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ENTRYPOINT_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    RESTART_POLICY_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    NETWORKS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    ENGINE_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    UNSUPPORTED_FIELD_NUMBER: _ClassVar[int]
    LAYER_SIZES_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    image: str
    image_id: str
    image_tags: _containers.RepeatedScalarFieldContainer[str]
    diff_ids: _containers.RepeatedScalarFieldContainer[str]
    command: _containers.RepeatedScalarFieldContainer[str]
    entrypoint: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    working_dir: str
    user: str
    hostname: str
    restart_policy: str
    ports: _containers.RepeatedCompositeFieldContainer[PortBinding]
    volumes: _containers.RepeatedCompositeFieldContainer[VolumeSpec]
    networks: _containers.RepeatedScalarFieldContainer[str]
    running: bool
    engine_config_json: str
    memory_bytes: int
    unsupported: _containers.RepeatedScalarFieldContainer[str]
    layer_sizes: _containers.RepeatedScalarFieldContainer[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., image: _Optional[str] = ..., image_id: _Optional[str] = ..., image_tags: _Optional[_Iterable[str]] = ..., diff_ids: _Optional[_Iterable[str]] = ..., command: _Optional[_Iterable[str]] = ..., entrypoint: _Optional[_Iterable[str]] = ..., env: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., working_dir: _Optional[str] = ..., user: _Optional[str] = ..., hostname: _Optional[str] = ..., restart_policy: _Optional[str] = ..., ports: _Optional[_Iterable[_Union[PortBinding, _Mapping]]] = ..., volumes: _Optional[_Iterable[_Union[VolumeSpec, _Mapping]]] = ..., networks: _Optional[_Iterable[str]] = ..., running: _Optional[bool] = ..., engine_config_json: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., unsupported: _Optional[_Iterable[str]] = ..., layer_sizes: _Optional[_Iterable[int]] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("network", "driver", "subnet", "ipv4", "mac")
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    SUBNET_FIELD_NUMBER: _ClassVar[int]
    IPV4_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    network: str
    driver: str
    subnet: str
    ipv4: str
    mac: str
    def __init__(self, network: _Optional[str] = ..., driver: _Optional[str] = ..., subnet: _Optional[str] = ..., ipv4: _Optional[str] = ..., mac: _Optional[str] = ...) -> None: ...

class ListContainersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ContainerSummary(_message.Message):
    __slots__ = ("id", "name", "image", "state", "volumes", "unsupported")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    UNSUPPORTED_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    image: str
    state: str
    volumes: _containers.RepeatedScalarFieldContainer[str]
    unsupported: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., image: _Optional[str] = ..., state: _Optional[str] = ..., volumes: _Optional[_Iterable[str]] = ..., unsupported: _Optional[_Iterable[str]] = ...) -> None: ...

class ListContainersReply(_message.Message):
    __slots__ = ("containers",)
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    containers: _containers.RepeatedCompositeFieldContainer[ContainerSummary]
    def __init__(self, containers: _Optional[_Iterable[_Union[ContainerSummary, _Mapping]]] = ...) -> None: ...

class TrialReply(_message.Message):
    __slots__ = ("problem", "seconds")
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    problem: str
    seconds: float
    def __init__(self, problem: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class HistoryRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class HistoryEntry(_message.Message):
    __slots__ = ("migration_id", "role", "container", "peer", "state", "updated", "error", "report")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    role: str
    container: str
    peer: str
    state: str
    updated: float
    error: str
    report: MigrationReport
    def __init__(self, migration_id: _Optional[str] = ..., role: _Optional[str] = ..., container: _Optional[str] = ..., peer: _Optional[str] = ..., state: _Optional[str] = ..., updated: _Optional[float] = ..., error: _Optional[str] = ..., report: _Optional[_Union[MigrationReport, _Mapping]] = ...) -> None: ...

class HistoryReply(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[HistoryEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[HistoryEntry, _Mapping]]] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ("source_node", "spec")
    SOURCE_NODE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    source_node: str
    spec: ContainerSpec
    def __init__(self, source_node: _Optional[str] = ..., spec: _Optional[_Union[ContainerSpec, _Mapping]] = ...) -> None: ...

class PlanItem(_message.Message):
    __slots__ = ("kind", "item", "bytes", "origin", "seconds", "reason")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    item: str
    bytes: int
    origin: str
    seconds: float
    reason: str
    def __init__(self, kind: _Optional[str] = ..., item: _Optional[str] = ..., bytes: _Optional[int] = ..., origin: _Optional[str] = ..., seconds: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class PlanReply(_message.Message):
    __slots__ = ("items", "bytes", "seconds", "link", "problems")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[PlanItem]
    bytes: int
    seconds: float
    link: str
    problems: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, items: _Optional[_Iterable[_Union[PlanItem, _Mapping]]] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., link: _Optional[str] = ..., problems: _Optional[_Iterable[str]] = ...) -> None: ...

class MissingLayersRequest(_message.Message):
    __slots__ = ("diff_ids",)
    DIFF_IDS_FIELD_NUMBER: _ClassVar[int]
    diff_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, diff_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class MissingLayersReply(_message.Message):
    __slots__ = ("missing",)
    MISSING_FIELD_NUMBER: _ClassVar[int]
    missing: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, missing: _Optional[_Iterable[str]] = ...) -> None: ...

class ImageRef(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: str
    def __init__(self, image: _Optional[str] = ...) -> None: ...

class ImageConfigReply(_message.Message):
    __slots__ = ("config", "repo_tags")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    REPO_TAGS_FIELD_NUMBER: _ClassVar[int]
    config: bytes
    repo_tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, config: _Optional[bytes] = ..., repo_tags: _Optional[_Iterable[str]] = ...) -> None: ...

class LayerRef(_message.Message):
    __slots__ = ("diff_id",)
    DIFF_ID_FIELD_NUMBER: _ClassVar[int]
    diff_id: str
    def __init__(self, diff_id: _Optional[str] = ...) -> None: ...

class Holding(_message.Message):
    __slots__ = ("key", "node", "timestamp", "size", "digest")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    key: str
    node: str
    timestamp: float
    size: int
    digest: str
    def __init__(self, key: _Optional[str] = ..., node: _Optional[str] = ..., timestamp: _Optional[float] = ..., size: _Optional[int] = ..., digest: _Optional[str] = ...) -> None: ...

class HoldingsRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class HoldingsReply(_message.Message):
    __slots__ = ("holdings",)
    HOLDINGS_FIELD_NUMBER: _ClassVar[int]
    holdings: _containers.RepeatedCompositeFieldContainer[Holding]
    def __init__(self, holdings: _Optional[_Iterable[_Union[Holding, _Mapping]]] = ...) -> None: ...

class HeldRef(_message.Message):
    __slots__ = ("key", "timestamp", "migration_id", "source_node")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NODE_FIELD_NUMBER: _ClassVar[int]
    key: str
    timestamp: float
    migration_id: str
    source_node: str
    def __init__(self, key: _Optional[str] = ..., timestamp: _Optional[float] = ..., migration_id: _Optional[str] = ..., source_node: _Optional[str] = ...) -> None: ...

class VouchRequest(_message.Message):
    __slots__ = ("migration_id", "destination_node", "keys")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_NODE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    destination_node: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, migration_id: _Optional[str] = ..., destination_node: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ...) -> None: ...

class VouchReply(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("size",)
    SIZE_FIELD_NUMBER: _ClassVar[int]
    size: int
    def __init__(self, size: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class SnapshotVolumeRequest(_message.Message):
    __slots__ = ("migration_id", "volume")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    volume: str
    def __init__(self, migration_id: _Optional[str] = ..., volume: _Optional[str] = ...) -> None: ...

class SnapshotRootfsRequest(_message.Message):
    __slots__ = ("migration_id",)
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    def __init__(self, migration_id: _Optional[str] = ...) -> None: ...

class BaseOffer(_message.Message):
    __slots__ = ("migration_id", "path", "signature")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    path: str
    signature: bytes
    def __init__(self, migration_id: _Optional[str] = ..., path: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class OfferReply(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...

class FinalSyncRequest(_message.Message):
    __slots__ = ("migration_id", "delta_format")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    DELTA_FORMAT_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    delta_format: int
    def __init__(self, migration_id: _Optional[str] = ..., delta_format: _Optional[int] = ...) -> None: ...

class FinalChunk(_message.Message):
    __slots__ = ("item", "data")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    item: FinalItem
    data: bytes
    def __init__(self, item: _Optional[_Union[FinalItem, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class FinalItem(_message.Message):
    __slots__ = ("path", "size", "method", "digest")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    method: str
    digest: str
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., method: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class FileInfo(_message.Message):
    __slots__ = ("path", "size", "digest")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    digest: str
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., digest: _Optional[str] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("migration_id", "container", "name", "leave_running", "page_server", "lazy_pages", "keep_connections")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LEAVE_RUNNING_FIELD_NUMBER: _ClassVar[int]
    PAGE_SERVER_FIELD_NUMBER: _ClassVar[int]
    LAZY_PAGES_FIELD_NUMBER: _ClassVar[int]
    KEEP_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    container: str
    name: str
    leave_running: bool
    page_server: bool
    lazy_pages: bool
    keep_connections: bool
    def __init__(self, migration_id: _Optional[str] = ..., container: _Optional[str] = ..., name: _Optional[str] = ..., leave_running: _Optional[bool] = ..., page_server: _Optional[bool] = ..., lazy_pages: _Optional[bool] = ..., keep_connections: _Optional[bool] = ...) -> None: ...

class PageBytes(_message.Message):
    __slots__ = ("migration_id", "data", "lazy")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAZY_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    data: bytes
    lazy: bool
    def __init__(self, migration_id: _Optional[str] = ..., data: _Optional[bytes] = ..., lazy: _Optional[bool] = ...) -> None: ...

class CheckpointReply(_message.Message):
    __slots__ = ("files", "seconds", "method")
    FILES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[FileInfo]
    seconds: float
    method: str
    def __init__(self, files: _Optional[_Iterable[_Union[FileInfo, _Mapping]]] = ..., seconds: _Optional[float] = ..., method: _Optional[str] = ...) -> None: ...

class FileRef(_message.Message):
    __slots__ = ("migration_id", "path")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    path: str
    def __init__(self, migration_id: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class DeltaRequest(_message.Message):
    __slots__ = ("target", "signature", "delta_format")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    DELTA_FORMAT_FIELD_NUMBER: _ClassVar[int]
    target: FileRef
    signature: bytes
    delta_format: int
    def __init__(self, target: _Optional[_Union[FileRef, _Mapping]] = ..., signature: _Optional[bytes] = ..., delta_format: _Optional[int] = ...) -> None: ...

class HoldBeat(_message.Message):
    __slots__ = ("migration_id",)
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    def __init__(self, migration_id: _Optional[str] = ...) -> None: ...

class HoldReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("migration_id", "container", "checkpoint")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    container: str
    checkpoint: str
    def __init__(self, migration_id: _Optional[str] = ..., container: _Optional[str] = ..., checkpoint: _Optional[str] = ...) -> None: ...

class ResumeReply(_message.Message):
    __slots__ = ("restored", "detail")
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    restored: bool
    detail: str
    def __init__(self, restored: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("migration_id", "container", "remove_container", "completed")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    REMOVE_CONTAINER_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    container: str
    remove_container: bool
    completed: bool
    def __init__(self, migration_id: _Optional[str] = ..., container: _Optional[str] = ..., remove_container: _Optional[bool] = ..., completed: _Optional[bool] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MigrateRequest(_message.Message):
    __slots__ = ("container", "source_node", "remove_source", "mode", "migration_id", "allow_privileged", "memory_transfer", "connections")
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NODE_FIELD_NUMBER: _ClassVar[int]
    REMOVE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PRIVILEGED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TRANSFER_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    container: str
    source_node: str
    remove_source: bool
    mode: Mode
    migration_id: str
    allow_privileged: bool
    memory_transfer: str
    connections: str
    def __init__(self, container: _Optional[str] = ..., source_node: _Optional[str] = ..., remove_source: _Optional[bool] = ..., mode: _Optional[_Union[Mode, str]] = ..., migration_id: _Optional[str] = ..., allow_privileged: _Optional[bool] = ..., memory_transfer: _Optional[str] = ..., connections: _Optional[str] = ...) -> None: ...

class PhaseReport(_message.Message):
    __slots__ = ("phase", "seconds", "bytes", "literal_bytes", "matched_bytes")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    LITERAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MATCHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    phase: Phase
    seconds: float
    bytes: int
    literal_bytes: int
    matched_bytes: int
    def __init__(self, phase: _Optional[_Union[Phase, str]] = ..., seconds: _Optional[float] = ..., bytes: _Optional[int] = ..., literal_bytes: _Optional[int] = ..., matched_bytes: _Optional[int] = ...) -> None: ...

class TransferReport(_message.Message):
    __slots__ = ("kind", "item", "origin", "phase", "bytes", "seconds", "method", "reason")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    item: str
    origin: str
    phase: Phase
    bytes: int
    seconds: float
    method: str
    reason: str
    def __init__(self, kind: _Optional[str] = ..., item: _Optional[str] = ..., origin: _Optional[str] = ..., phase: _Optional[_Union[Phase, str]] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., method: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class OriginReport(_message.Message):
    __slots__ = ("node", "bytes", "seconds")
    NODE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    node: str
    bytes: int
    seconds: float
    def __init__(self, node: _Optional[str] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class MigrationReport(_message.Message):
    __slots__ = ("migration_id", "container", "source_node", "destination_node", "new_container_id", "total_seconds", "downtime_seconds", "phases", "transfers", "origins", "mode", "checkpoint_method", "restore_method", "memory_transfer", "pages_seconds", "connections")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NODE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_NODE_FIELD_NUMBER: _ClassVar[int]
    NEW_CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PHASES_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    ORIGINS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_METHOD_FIELD_NUMBER: _ClassVar[int]
    RESTORE_METHOD_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TRANSFER_FIELD_NUMBER: _ClassVar[int]
    PAGES_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    container: str
    source_node: str
    destination_node: str
    new_container_id: str
    total_seconds: float
    downtime_seconds: float
    phases: _containers.RepeatedCompositeFieldContainer[PhaseReport]
    transfers: _containers.RepeatedCompositeFieldContainer[TransferReport]
    origins: _containers.RepeatedCompositeFieldContainer[OriginReport]
    mode: Mode
    checkpoint_method: str
    restore_method: str
    memory_transfer: str
    pages_seconds: float
    connections: str
    def __init__(self, migration_id: _Optional[str] = ..., container: _Optional[str] = ..., source_node: _Optional[str] = ..., destination_node: _Optional[str] = ..., new_container_id: _Optional[str] = ..., total_seconds: _Optional[float] = ..., downtime_seconds: _Optional[float] = ..., phases: _Optional[_Iterable[_Union[PhaseReport, _Mapping]]] = ..., transfers: _Optional[_Iterable[_Union[TransferReport, _Mapping]]] = ..., origins: _Optional[_Iterable[_Union[OriginReport, _Mapping]]] = ..., mode: _Optional[_Union[Mode, str]] = ..., checkpoint_method: _Optional[str] = ..., restore_method: _Optional[str] = ..., memory_transfer: _Optional[str] = ..., pages_seconds: _Optional[float] = ..., connections: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("kind", "item", "bytes_done", "bytes_total")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    kind: str
    item: str
    bytes_done: int
    bytes_total: int
    def __init__(self, kind: _Optional[str] = ..., item: _Optional[str] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ...) -> None: ...

class MigrationEvent(_message.Message):
    __slots__ = ("phase_started", "phase_done", "transfer", "done", "log", "progress")
    PHASE_STARTED_FIELD_NUMBER: _ClassVar[int]
    PHASE_DONE_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    phase_started: PhaseReport
    phase_done: PhaseReport
    transfer: TransferReport
    done: MigrationReport
    log: str
    progress: Progress
    def __init__(self, phase_started: _Optional[_Union[PhaseReport, _Mapping]] = ..., phase_done: _Optional[_Union[PhaseReport, _Mapping]] = ..., transfer: _Optional[_Union[TransferReport, _Mapping]] = ..., done: _Optional[_Union[MigrationReport, _Mapping]] = ..., log: _Optional[str] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ...) -> None: ...
