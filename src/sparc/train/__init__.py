"""Training: the loop, its data sampling, checkpoints, logging and the `train` stage.

Importing this package sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the environment sets it), before
PyTorch loads its OpenMP runtime (libgomp, which reads the variable once, when it is loaded; the
`train` stage imports this package before torch). A training step runs hundreds of short parallel
regions (matmuls, the sparse kernels, the row-block decoder maintenance); under libgomp's default
policy a thread that reaches the end of one spins for up to about a millisecond waiting for the
next, on a core another process may need, and with a busy process beside it (a second DVC
experiment, ``dvc queue start -j 2``, a shared machine) the step's threads keep waiting at
barriers for a thread that was descheduled: on 2 cores beside one busy process the step slowed
3.1x against the floor's 1.5x (docs/benchmarks.md). Passive threads sleep at once; the results do
not depend on the policy. Where torch was imported first the variable comes too late and changes
nothing (set it in the environment then).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
