"""Reports over runs: the multi-seed ablation grid and its tables (sparc.report.ablation)."""
