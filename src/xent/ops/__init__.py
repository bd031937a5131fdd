"""The ops layer: xent's losses as torch.library custom ops, their autograd, and the eager fast path.

A validated problem (validation/) runs one of three ways, chosen per call by ``problems.route``:

* **eager** (plain tensors): an ``autograd.Function`` whose forward asks the kernels for the loss and, when
  autograd will want it, the gradient for a unit upstream gradient. The gradient is a real saved tensor
  (``saved_tensors_hooks`` see it, so offloading tools can move it); backward scales it in place by the
  upstream gradient (``kernels.scale_by_upstream_``: nothing at all for the 1.0 of ``loss.backward()``)
  and hands it over (handover.py). A second backward (``retain_graph=True``) recomputes it.
* **traced** (``torch.compile``, ``torch.export``, ``make_fx``): custom ops, opaque to the tracer, each
  family declared once from its problem's fields (declare.py), which gives the schema, the fake (shapes
  and dtypes only), the backward op and the autograd that the tracer records. Value checks run inside
  the ops, on real tensors, at run time.
* **torch.func** transforms (grad, vjp, jacrev, jacfwd, hessian, vmap): the formulas of
  ``xent.reference`` in the compute dtype, plain differentiable torch ops that every transform handles.
  They materialize log-softmax, as torch's own losses do under these transforms.

The RL log-probabilities and the vocab-parallel RL ops take their declared op on both the eager and the
traced route (their backward recomputes, so there is nothing to hand over). Every route computes the same
formulas; the eager and traced routes run the very same kernels.

Modules: cross_entropy.py, linear.py, rl.py, distill.py, vocab_parallel.py (one per loss family);
declare.py (the op declaration), handover.py (the eager gradient handover), statistics.py (per-token
statistics through an op).
"""
