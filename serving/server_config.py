"""tritonserver's options as data: `ServerConfig.arguments()` is the one place they become its command line,
for `d3qe serve` (`serving.server.TritonServer`) and for the container (`deploy/tritonserver.sh`, written by
`container_script`).

Secure by default: model control off (`--model-control-mode=none`); the model-repository, logging and trace
APIs, and system/CUDA shared memory, restricted to a header whose value is a random secret nobody is told,
which switches them off; every address loopback unless asked otherwise. Model control (`model_control`:
`--model-control-mode=explicit`, what `serving.rollout` loads and unloads with) keeps that header: the key
clients present is checked by the gRPC front (`serving.grpc_front.AdminKey`), which hands Triton its own
value, so that the operator's key never appears on a command line. A repository a rollout has changed is
served explicitly too, loading only its live models (`load_models`), model control on or off.

Shared memory is off because tritonserver 2.51 lets a client register any region under /dev/shm, the python
backend's own IPC regions included (their names are listed there): opt in (`shared_memory=True`, `d3qe serve
--shared-memory`) only where every client is trusted.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from d3qe_serve.serving.endpoints import LOOPBACK

# Where `d3qe export` writes and `d3qe serve` reads, relative to the working directory (`build/` is the
# checkout's ignored folder; the package `model_repository/` holds the models' code, not an export).
DEFAULT_REPOSITORY = Path("build") / "model_repository"
# Server APIs a client of this service never needs; `shared-memory` too unless asked for (see above).
RESTRICTED_APIS = ("model-repository", "logging", "trace")
ADMIN_HEADER = "d3qe-admin"  # the header that would open them, with a value nobody is given
# Triton's gRPC reads a restricted protocol's header under this prefix (its HTTP API under the bare name).
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
CACHE = "local"  # the response cache the wheel ships (caches/local/libtritoncache_local.so)


@dataclass(frozen=True)
class ServerConfig:
    """The options a tritonserver runs with. An address or port of None is Triton's own default (all
    addresses; HTTP 8000, gRPC 8001, metrics 8002), as in a container; the addresses default to loopback.

    `admin_key`: the value of `ADMIN_HEADER` that would open the restricted APIs: drawn at random and given
    to nobody. `model_config_name`: each model's `configs/<name>.pbtxt` where it has one (NVIDIA's container
    takes `native`). `shm_region_prefix`: the name prefix of the python backend's regions in /dev/shm.
    `model_control`: explicit model control (load and unload through the restricted model-repository API);
    `load_models`: the models loaded at start (explicit control; empty: every model of the repository).
    `cache_bytes`: Triton's local response cache of this size (None: none), from `cache_directory`.
    """

    model_repository: str | Path
    admin_key: str
    grpc_address: str | None = LOOPBACK
    grpc_port: int | None = None
    http_address: str | None = LOOPBACK
    http_port: int | None = None
    metrics_address: str | None = LOOPBACK
    metrics_port: int | None = None
    backend_directory: str | Path | None = None
    model_config_name: str | None = None
    shared_memory: bool = False
    shm_region_prefix: str | None = None
    model_control: bool = False
    load_models: tuple[str, ...] = ()
    cache_bytes: int | None = None
    cache_directory: str | Path | None = None

    @property
    def restricted_apis(self) -> tuple[str, ...]:
        return (*RESTRICTED_APIS, *([] if self.shared_memory else ["shared-memory"]))

    def arguments(self) -> list[str]:
        """tritonserver's command-line arguments (without the binary)."""
        restricted = f"{','.join(self.restricted_apis)}:{ADMIN_HEADER}={self.admin_key}"
        optional = {
            "backend-directory": self.backend_directory,
            "model-config-name": self.model_config_name,
        }
        listening = {
            "grpc-address": self.grpc_address,
            "grpc-port": self.grpc_port,
            "http-address": self.http_address,
            "http-port": self.http_port,
            "metrics-address": self.metrics_address,
            "metrics-port": self.metrics_port,
        }
        shm = {"backend-config": f"python,shm-region-prefix-name={self.shm_region_prefix}"}
        explicit = self.model_control or bool(self.load_models)
        control = (
            ["--model-control-mode=explicit", *(f"--load-model={m}" for m in self.load_models or ["*"])]
            if explicit
            else ["--model-control-mode=none"]  # the repository is fixed for the server's life
        )
        cache = {"cache-directory": self.cache_directory, "cache-config": f"{CACHE},size={self.cache_bytes}"}
        return [
            f"--model-repository={self.model_repository}",
            *(f"--{flag}={value}" for flag, value in optional.items() if value is not None),
            *control,
            "--disable-auto-complete-config",  # configs are complete; auto-complete would start a stub per model
            "--strict-readiness=true",
            "--exit-on-error=true",
            *(f"--{flag}={value}" for flag, value in listening.items() if value is not None),
            f"--grpc-restricted-protocol={restricted}",
            f"--http-restricted-api={restricted}",
            *(f"--{flag}={value}" for flag, value in shm.items() if self.shm_region_prefix is not None),
            *(f"--{flag}={value}" for flag, value in cache.items() if self.cache_bytes and value is not None),
        ]


# deploy/tritonserver.sh: the model repository from the environment, the admin key drawn by the shell.
CONTAINER_CONFIG = ServerConfig(
    "${D3QE_MODEL_REPOSITORY:-/models}",
    admin_key="$key",
    grpc_address=None,
    http_address=None,
    metrics_address=None,
    model_config_name="native",
)
_CONTAINER_HEADER = """\
#!/bin/sh
# Written by d3qe_serve.serving.server_config.container_script() from the ServerConfig `d3qe serve` uses:
# change it there (tests/test_deploy.py checks that this file is what it writes).
#
# The container's command: tritonserver on the exported repository with `d3qe serve`'s flags, plus the
# native configs. Extra arguments go to tritonserver.
#
# --model-config-name=native   each part's configs/native.pbtxt (onnxruntime_onnx / tensorrt_plan),
#                              config.pbtxt for every model without one (the python-backend models)
# --model-control-mode=none    the repository is fixed for the pod's life
# --disable-auto-complete-config   the configs are complete; auto-completion would start a python
#                              stub per model just to ask it
# --*-restricted-*             the model-repository, logging, trace and shared-memory APIs need a
#                              header whose value is drawn here and given to nobody: they are off.
#                              Shared memory above all: Triton 2.51 lets a client map any /dev/shm
#                              region, the python backend's own included.
# Ports are Triton's defaults (HTTP 8000, gRPC 8001, metrics 8002), listening on all addresses.
set -eu
key=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \\n')
exec tritonserver \\
"""


def _shell_word(argument: str) -> str:
    """`--flag=value` for sh: a value naming a shell variable in double quotes (expanded), others quoted as needed."""
    flag, equals, value = argument.partition("=")
    if not equals:
        return flag
    return f'{flag}="{value}"' if "$" in value else f"{flag}={shlex.quote(value)}"


def container_script() -> str:
    """deploy/tritonserver.sh: `CONTAINER_CONFIG`'s arguments, then the container's own."""
    words = [*map(_shell_word, CONTAINER_CONFIG.arguments()), '"$@"']
    return _CONTAINER_HEADER + " \\\n".join(f"    {w}" for w in words) + "\n"
