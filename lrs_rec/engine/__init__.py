"""The one blockwise AMHT-LRS engine (paper Algorithm 1 with the regularised rating extensions).

``steps``: the state and the alternating steps (user w/b step, U step, item step) over user / item
blocks sized by a memory budget; ``grouped``: per-key Gram and sum reductions; ``parallel``: the
deterministic block-parallel map and the thread / memory-budget knobs. numpy/scipy only: the
rating trainer (``lrs_rec.training``) and the paper estimator (``lrs_rec.amht``) both run on it.
The paper's options of the same steps: ``sparse_b`` (the b-step of Eq. 3 by hard thresholding —
``StepParams.b_step`` "htp"/"iht"), ``u_solve`` (the joint / matrix-free U-step, QR), ``user_rows``
(the per-user row layout those two use within a block).
"""
