"""The hand-off to serving: publish the promotion alias's adapter to vLLM, KServe and OCI registries.

- `plan`: plain decisions (which targets need work, backoff, the Published conditions);
- `vllm`, `kserve`, `oci`: one publisher per target kind, each `publish(ctx, target, alias, served)`;
- `publish`: runs the due publishers for a job and folds their outcomes into its status.
"""
