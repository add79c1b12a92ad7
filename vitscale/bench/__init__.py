"""`vitscale bench`: attention kernels, full train steps and the data pipeline, as tables + JSON."""
