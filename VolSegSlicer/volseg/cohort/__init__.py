"""Many cases with one model: batch runs, a Ray cluster, the manifest, cohort progress."""
