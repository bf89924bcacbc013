"""Several replicas behind a router, simulated together (issue #19).

``simulate_cluster(workload, engine, perf, ClusterSpec(...))`` runs them on one
SimPy clock; ``ROUTERS`` holds the routers by name (simulator.cluster.router).
"""

from simulator.cluster.cluster import ClusterResult, ClusterSpec, simulate_cluster
from simulator.cluster.router import (
           ROUTERS,
           ReplicaReport,
           Router,
           RouteRequest,
           make_router,
           register,
)

__all__ = ["ROUTERS", "ClusterResult", "ClusterSpec", "ReplicaReport", "RouteRequest", "Router", "make_router",
           "register", "simulate_cluster"]
