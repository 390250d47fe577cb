"""`ztagent lab`: a two-node ambient mesh on one Linux host, built from network namespaces.

`topology` plans names and addresses from the settings, `netns` runs `ip`, `state` records
what was made so `down` can always remove it, `apps` is the pods' echo app, `command` is
`ztagent lab up|demo|status|down` and `demo` holds the checks.
"""
