"""sparse_linear_attention: slattn's drop-in for the public SLA reference package.

Code written against the public Sparse-Linear Attention reference imports
``from sparse_linear_attention import SparseLinearAttention``; this package
satisfies that import with slattn's implementation. ``SparseLinearAttention``
here is the very same class object as ``slattn.SparseLinearAttention`` (same
constructor signature, same ``forward(q, k, v, return_sparsity=False)``, same
``proj_l.weight`` / ``proj_l.bias`` state keys), so isinstance checks and
checkpoints carry over unchanged::

    from sparse_linear_attention import SparseLinearAttention
    attn = SparseLinearAttention(head_dim=128, topk=0.05, feature_map="softmax")
    output = attn(q, k, v)  # q, k, v: [B, H, L, D]
"""

from slattn import SparseLinearAttention, __version__

__all__ = ["SparseLinearAttention"]
