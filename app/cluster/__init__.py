"""craftserve on Ray Serve (`craftserve serve --ray`; the `craftserve[ray]` extra).

The same FastAPI app (every route, auth, dialect, error shape) runs in an ingress deployment;
its engine is `RemoteEngine`, a facade with the Engine's methods that sends each job to a
generation deployment whose replicas each run craftserve's own Engine on one device (queue,
batching, LoRA cache, OOM recovery unchanged). Ray Serve does the rest: routing (model
multiplexing: a request goes to a replica that holds its model), autoscaling, health checks,
replacing dead replicas.

- `wire`: what crosses between processes (job events, errors) as plain values;
- `remote`: the ingress side (RemoteEngine);
- `replica`: the generation side (one Engine per replica, a model LRU Ray routes on);
- `board`: a tiny actor where replicas post their state (readiness, reload requests);
- `deploy`: the Ray Serve application and the CLI's `--ray` entry.

Only `deploy` and `board` import Ray at module level; nothing here is imported by the plain
server.
"""
