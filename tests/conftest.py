"""Test set-up: 8 emulated CPU devices (set before JAX is imported) and tiny configs."""

import importlib.util
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str = "tiny", **overrides):
    """configs/<name>.py's get_config() with dotted-key overrides ("training.max_steps": 4)."""
    path = os.path.join(REPO, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
