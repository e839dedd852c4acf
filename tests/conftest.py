"""Test set-up: 8 simulated CPU devices, float32 matmuls at full precision, fixture discovery."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile from scratch unless a test turns the persistent compilation cache on itself.
os.environ.setdefault("LAVIT_COMPILATION_CACHE", "0")

import pathlib  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def fixture_dirs() -> list[pathlib.Path]:
    """Fixture directories: $LAVIT_FIXTURES (colon-separated) or every ../shared/fixtures/* with io.npz."""
    env = os.environ.get("LAVIT_FIXTURES")
    if env:
        return [pathlib.Path(p) for p in env.split(":") if p]
    root = SHARED / "fixtures"
    return sorted(p for p in root.iterdir() if (p / "io.npz").is_file()) if root.is_dir() else []


def video_fixture_dirs() -> list[pathlib.Path]:
    """Video-LaVIT fixture sets: every ../shared/fixtures/video/* with io.npz, plus $LAVIT_VIDEO_FIXTURES
    (colon-separated directories)."""
    root = SHARED / "fixtures" / "video"
    dirs = sorted(p for p in root.iterdir() if (p / "io.npz").is_file()) if root.is_dir() else []
    env = os.environ.get("LAVIT_VIDEO_FIXTURES", "")
    dirs += [pathlib.Path(p) for p in env.split(":") if p and pathlib.Path(p) not in dirs]
    return dirs
