"""craftserve on Ray Serve (`craftserve serve --ray`; the `craftserve[ray]` extra).

The same FastAPI app (every route, auth, dialect, error shape) runs in an ingress deployment;
its engine is `RemoteEngine`, a facade with the Engine's methods that sends each job to a
generation deployment whose replicas each run craftserve's own Engine on one device (queue,
batching, LoRA cache, OOM recovery unchanged). The ingress routes: one fair queue for the
cluster, each replica holding about two batches of jobs, hot models loaded on more replicas
(`dispatch`); Ray Serve delivers each call to the replica named (`router`) and does
autoscaling, health checks and replacing dead replicas.

- `wire`: what crosses between processes (job events, errors) as plain values;
- `remote`: the ingress side (RemoteEngine);
- `dispatch`: the ingress's queue and routing rules (plain Python, no Ray);
- `router`: Serve's request router that sends a call to the replica the ingress chose;
- `replica`: the generation side (one Engine per replica, its model LRU);
- `board`: a tiny actor where replicas post their state (readiness, reload requests);
- `deploy`: the Ray Serve application and the CLI's `--ray` entry.

Only `deploy`, `board` and `router` import Ray at module level; nothing here is imported by the plain
server.
"""
