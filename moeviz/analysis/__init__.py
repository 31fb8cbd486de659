"""Pure, torch-free functions of RoutingTraces: metrics and routing policies."""
