"""Serve control: what changes and watches running Serve apps from outside them (a driver, the CLI).

    rollout.py      warm a version on every node, validate it, switch an app to it, confirm or roll back
    watch.py        follow a registry alias and roll out each move
    apps.py         read the running apps and re-apply their declarative configs
    config_file.py  a Serve config file and where it keeps an app's model URI (mode redeploy)
    replicas.py     what each replica serves (published by the replicas, read by rollout and status --app)
    compat.py       every private Ray / Serve name used here (Ray 2.60), each with its public alternative

Nothing here is imported by a replica except replicas.py (publish / last good model).
"""
