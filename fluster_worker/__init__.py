"""fluster-worker: the node agent of the Fluster cluster system.

A job flows RPC (``service``) -> ``manager.JobManager`` -> ``bundle.BundleCache``
-> ``builder.ImageBuilder`` -> ``docker.ContainerRuntime`` -> ``logs`` -> status.
"""

__version__ = "0.1.0"
