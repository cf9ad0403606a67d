"""Reading, writing, simulating and sampling diffusion MRI data."""
