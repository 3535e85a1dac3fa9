"""What must hold across processes: augmentation draws do not depend on the interpreter's hash seed."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from seed.views import Recipe, draw_views


def test_draw_does_not_depend_on_the_process() -> None:
    keys = [f"k{i}" for i in range(50)]
    here = np.concatenate([draw_views(Recipe(), seed=0, key=k, views=4, height=28, width=28) for k in keys])
    code = ("import numpy as np, sys; from seed.views import Recipe, draw_views; "
            "sys.stdout.write(np.concatenate([draw_views(Recipe(), seed=0, key=f'k{i}', views=4, height=28, width=28) "
            "for i in range(50)]).tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout
    assert bytes.fromhex(out) == here.tobytes()
