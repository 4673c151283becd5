"""`pip install .` is a single node: serving one never imports the cluster extra's clients."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def test_a_single_node_runs_without_the_cluster_extra(tmp_path: Path) -> None:
    """Assemble and start a single node's app in a fresh interpreter whose `redis` and
    `aiobotocore` cannot be imported (as on an install without the `cluster` extra)."""
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        class Missing:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("redis", "aiobotocore", "botocore"):
                    raise ImportError(f"{{name}} is not installed (test)")
                return None
        sys.meta_path.insert(0, Missing())
        from mirror.config import load_config
        from mirror.node import open_node
        from mirror.web.app import make_app
        import mirror.cli, mirror.maintenance, mirror.bundle, mirror.warm
        config = load_config(None, env={{}}, overrides={{"cache.dir": {str(tmp_path)!r}}})
        async def main():
            make_app(config)
            async with open_node(config) as node:
                assert node.shared.status() == {{}}
        asyncio.run(main())
        print("single node ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "single node ok" in done.stdout
