"""`migctl bench`: traditional vs cooperative vs the reference method, measured on a grid of
link profiles × workloads × sizes × modes, repeated, in random order, with medians and
confidence intervals. The lab driver (driver.py) runs one migration; the rest is here."""
