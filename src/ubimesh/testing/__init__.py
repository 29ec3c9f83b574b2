"""Tools for tests of ubimesh and of the services around it.

Nothing in this package is imported by the proxy or the control plane: it holds test
instruments, such as :mod:`ubimesh.testing.faultproxy`, that are shipped with ubimesh so that
its own tests and its users' tests can put faults between a proxy and its upstreams.
"""
