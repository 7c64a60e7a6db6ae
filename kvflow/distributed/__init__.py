"""Scale-out: tensor parallel (ranks of one model) and data-parallel replicas (their router and
the Ray backend)."""
