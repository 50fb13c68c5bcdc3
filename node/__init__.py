"""LayerLink node: the lower layer. Probes hardware, advertises over mDNS, serves model
layers over gRPC. Never imports `coordinator`."""

__version__ = "0.1.0"
# Bumped on a wire change that breaks a peer; advertised over mDNS and in NodeInfo.
PROTOCOL_VERSION = 1
