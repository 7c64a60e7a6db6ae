"""Scale-out: data-parallel replicas, their router and the Ray backend; tensor parallel."""
