"""The python-backend models Triton loads, as ordinary package code.

`serving.repository.write_repository` copies each module here into a model's `1/model.py`; inside
Triton they import this installation's `d3qe` and `serving` packages. They import
`triton_python_backend_utils`, which exists only inside Triton's python backend: outside it these
modules are read, never imported.

- `preprocess`: IMAGE bytes → PIXELS (upstream's eval transform)
- `check_pixels`: PIXELS from a client → CHECKED (finite, in [0, 1])
- `part`: one model serving any of the three exported parts (`vq_encoder`, `clip_visual`, `d3qe_head`)
- `admission`: the gate in front of each ensemble, where overload is refused
"""
