"""Ray start-up and placement: join a cluster or start an embedded loopback one, reserve
bundles with a timeout and a useful error, place actors on them, and take it all down."""

from __future__ import annotations

import os

import numpy as np

__all__ = ["connect", "start_local_ray", "reserve_bundles", "start_actor", "kill_actor", "remove_bundles",
           "disconnect"]


def start_local_ray(num_cpus: float = 0, num_gpus: float = 0) -> None:
    """Start an embedded Ray whose sockets all listen on 127.0.0.1.

    It gets the machine's cores, or ``num_cpus`` if more (Ray's CPUs are a scheduling
    count, not a pinning), and ⌈num_gpus⌉ GPUs.  Ray binds the machine's network address
    unless its "local only" switch is off; the switch is read from the environment at
    import (by this process and by the raylet and workers it starts), so it is set for
    the start and put back afterwards.
    """
    import ray
    from ray._private import ray_constants

    key = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    saved_env, saved_flag = os.environ.get(key), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[key] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        cpus = max(int(np.ceil(num_cpus)), os.cpu_count() or 1)
        ray.init(num_cpus=cpus, num_gpus=int(np.ceil(num_gpus)) or None,
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
    finally:
        if saved_env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved_env
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag


def connect(address: str | None, *, num_cpus: float = 0, num_gpus: float = 0) -> bool:
    """Connect to Ray unless this process already is; True when this call started it.

    ``address`` None starts the embedded loopback Ray (:func:`start_local_ray` with
    ``num_cpus``/``num_gpus``); ``"auto"`` or ``"ray://host:port"`` joins a running cluster.
    """
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        start_local_ray(num_cpus, num_gpus)
    else:
        ray.init(address=address, log_to_driver=False)
    return True


def reserve_bundles(bundle: dict, count: int, *, strategy: str, timeout_s: float):
    """A ready placement group of ``count`` copies of ``bundle``.

    Raises
    ------
    RuntimeError
        The cluster did not grant them within ``timeout_s``; the message lists what was
        asked for and what is free.  The group is removed first.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([dict(bundle) for _ in range(count)], strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        available = ray.available_resources()
        remove_placement_group(pg)
        raise RuntimeError(
            f"Ray could not place {count} workers of {bundle} within {timeout_s:g}s; "
            f"the cluster has {({k: v for k, v in available.items() if k in ('CPU', 'GPU', 'memory')})} free. "
            "Lower num_workers or the per-worker resources, or add nodes."
        ) from None
    return pg


def start_actor(actor_class, pg, bundle_index: int, *args, num_cpus: float, num_gpus: float):
    """An actor of the Ray actor class ``actor_class`` on bundle ``bundle_index`` of ``pg``."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return actor_class.options(
        num_cpus=num_cpus, num_gpus=num_gpus,
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_index),
    ).remote(*args)


def kill_actor(actor) -> None:
    """Kill ``actor``; one that is already gone is left alone."""
    import ray

    try:
        ray.kill(actor)
    except Exception:  # noqa: BLE001 - the actor is already gone; nothing to release
        pass


def remove_bundles(pg) -> None:
    """Remove a placement group."""
    from ray.util.placement_group import remove_placement_group

    remove_placement_group(pg)


def disconnect() -> None:
    """Stop (or leave) Ray in this process."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
