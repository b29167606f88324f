"""A Serve config file (the `serve deploy` format) and where it keeps one app's model URI: what
`prefetch rollout --mode redeploy` rewrites.

The URI may live in the app's `args` (an application builder such as serving.examples:model_app: a new value is a
new code version, so Serve rolls new replicas) and/or in a deployment's `user_config` (Serve reconfigures the
running replicas). The edit changes those values in place, by character offsets from PyYAML's node marks, so
comments, quoting and order survive; the result is checked against the intended document, and re-written from
the parsed form (saying so) when an unusual layout defeats the in-place edit.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from prefetch.errors import BadURI, one_line

MODEL_KEYS = ("model_uri", "format", "convert_options")


# -- the file ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ConfigFile:
    """A Serve config file (multi-app `serve deploy` format) and where it keeps one app's model URI."""

    path: Path
    text: str
    doc: dict
    app: str
    index: int                               # position of the app in `applications`
    places: list[tuple[str, ...]]            # ("args",) and/or ("deployments", i, "user_config")

    @classmethod
    def load(cls, path: str | os.PathLike, app: str) -> "ConfigFile":
        import yaml

        p = Path(path).expanduser()
        try:
            text = p.read_text()
        except FileNotFoundError:
            raise BadURI("no such Serve config file", str(p)) from None
        except OSError as e:
            raise BadURI(f"cannot read the Serve config file: {e.strerror or e}", str(p)) from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise BadURI(f"not valid YAML: {one_line(e)}", str(p)) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("applications"), list):
            raise BadURI("expected a Serve config with an 'applications:' list (the `serve deploy` format)", str(p))
        names = [a.get("name") if isinstance(a, dict) else None for a in doc["applications"]]
        if app not in names:
            raise BadURI(f"no application named '{app}' in it (it has: {', '.join(map(str, names)) or 'none'})",
                         str(p))
        index = names.index(app)
        entry = doc["applications"][index]
        places: list[tuple] = []
        if isinstance(entry.get("args"), dict) and "model_uri" in entry["args"]:
            places.append(("args",))
        for i, d in enumerate(entry.get("deployments") or []):
            if isinstance(d, dict) and isinstance(d.get("user_config"), dict) and "model_uri" in d["user_config"]:
                places.append(("deployments", i, "user_config"))
        if not places:
            raise BadURI(f"application '{app}' keeps no model_uri (neither in 'args' nor in a deployment's "
                         "'user_config')", str(p))
        try:
            from ray.serve.schema import ServeDeploySchema

            ServeDeploySchema.model_validate(doc)
        except Exception as e:  # noqa: BLE001 - pydantic's ValidationError: its first error is enough here
            errors = getattr(e, "errors", None)
            first = errors()[0] if callable(errors) and errors() else None
            why = f"{'.'.join(map(str, first['loc'])) or 'config'}: {first['msg']}" if first else one_line(e)
            raise BadURI(f"not a valid Serve config: {why}", str(p)) from None
        return cls(p, text, doc, app, index, places)

    @property
    def app_config(self) -> dict:
        return self.doc["applications"][self.index]

    def model_settings(self) -> dict:
        """The model_uri / format / convert_options the file gives (first place wins)."""
        out: dict = {}
        for place in reversed(self.places):
            out.update({k: v for k, v in _get(self.app_config, place).items() if k in MODEL_KEYS})
        return out

    def with_model(self, values: dict) -> tuple[str, dict, str | None]:
        """(new text, new doc, note): `values` (model_uri, and format / convert_options when given) written
        into every place, keeping the rest of the file byte for byte when it can (comments included)."""
        import yaml

        new_doc = copy.deepcopy(self.doc)
        for place in self.places:
            _get(new_doc["applications"][self.index], place).update(values)
        try:
            text = _edit_yaml(self.text, self.index, self.places, values)
            if yaml.safe_load(text) == new_doc:
                return text, new_doc, None
        except Exception:  # noqa: BLE001 - an unusual layout: fall back to re-writing the document
            pass
        return (yaml.safe_dump(new_doc, sort_keys=False, default_flow_style=False), new_doc,
                "the file was re-written from its parsed form (its comments and layout were not kept)")

    def write(self, text: str) -> None:
        """Atomically (temp file + rename), keeping the file's mode."""
        tmp = self.path.with_name(f".{self.path.name}.prefetch-{os.getpid()}")
        tmp.write_text(text)
        try:
            os.chmod(tmp, self.path.stat().st_mode & 0o7777)
        except OSError:
            pass
        os.replace(tmp, self.path)


def _get(node: dict, place: tuple) -> dict:
    for step in place:
        node = node[step]
    return node


def _edit_yaml(text: str, app_index: int, places: list[tuple], values: dict) -> str:
    """Replace (or insert) the scalar values of `values`' keys in each place, by character offsets from
    PyYAML's node marks, so everything else (comments, quoting, order) stays as written."""
    import yaml

    root = yaml.compose(text)
    app_node = _seq(_child(root, "applications")).value[app_index]
    edits: list[tuple[int, int, str]] = []
    for place in places:
        node = app_node
        for step in place:
            node = _seq(node).value[step] if isinstance(step, int) else _child(node, step)
        if not isinstance(node, yaml.MappingNode):
            raise ValueError("not a mapping")
        anchor = None
        for key, value in values.items():
            pair = next(((k, v) for k, v in node.value if k.value == key), None)
            if pair is not None:
                k, v = pair
                edits.append((v.start_mark.index, v.end_mark.index, _render(value, v)))
                if key == "model_uri":
                    anchor = (k, v)
        for key, value in values.items():
            if any(k.value == key for k, _ in node.value):
                continue
            if anchor is None or node.flow_style:
                raise ValueError("cannot insert a key here")
            k, v = anchor
            line_end = text.find("\n", v.end_mark.index)
            line_end = len(text) if line_end < 0 else line_end
            edits.append((line_end, line_end, f"\n{' ' * k.start_mark.column}{key}: {_render(value, None)}"))
    out = text
    for start, end, new in sorted(edits, key=lambda e: e[0], reverse=True):
        out = out[:start] + new + out[end:]
    return out


def _child(node, key: str):
    import yaml

    if not isinstance(node, yaml.MappingNode):
        raise ValueError("not a mapping")
    for k, v in node.value:
        if k.value == key:
            return v
    raise KeyError(key)


def _seq(node):
    import yaml

    if not isinstance(node, yaml.SequenceNode):
        raise ValueError("not a sequence")
    return node


def _render(value: Any, old) -> str:
    """A YAML spelling of value in the old scalar's quoting style (JSON is valid YAML for everything else)."""
    import yaml

    style = getattr(old, "style", None) if old is not None and isinstance(old, yaml.ScalarNode) else None
    if isinstance(value, str):
        if style == "'":
            return "'" + value.replace("'", "''") + "'"
        if style is None and value and yaml.safe_load(value) == value and "#" not in value and ": " not in value:
            return value
    return json.dumps(value)
