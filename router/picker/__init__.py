"""The Envoy endpoint picker: a second data plane over the core.  Envoy (or an Envoy-based
Gateway API inference gateway) carries the bytes; this process only decides, over Envoy's
ext_proc gRPC protocol, with the same intake, scheduling, breakers and hooks as the proxy."""
