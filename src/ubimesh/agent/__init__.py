"""``ubimesh agent``: a workload identity for an Envoy on the same host, served over SDS.

The agent gets the workload's certificate from the control plane with a join token and renews
it (``ubimesh.identity.workload``, the same code as the ubimesh proxy's), fetches the trust
bundle, and serves both over ``SecretDiscoveryService/StreamSecrets`` on a Unix socket (mode
0600): ``default`` (``tls_certificate``: chain and key inline) and ``ROOTCA``
(``validation_context.trusted_ca``: the bundle).  See :mod:`ubimesh.agent.server`.
"""

from ubimesh.agent.server import Agent, AgentOptions, serve

__all__ = ["Agent", "AgentOptions", "serve"]
