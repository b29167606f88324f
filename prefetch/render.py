"""Every rich table and event line the CLI prints. The library returns data (dicts, dataclasses); this module
turns it into text. It imports neither ray nor serving: it only formats what it is given."""
from __future__ import annotations


# --- local store: ls, verify, gc, pins, plan -----------------------------------------------------------------



# --- cluster: warm --cluster, status, daemon -----------------------------------------------------------------



# --- Serve control: rollout and watch events, app status -----------------------------------------------------
