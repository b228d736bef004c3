"""The paper's Tables 1-4 and its open choices as one plan of cells (`python -m eval.reproduce`).

`plan` (the cells and their published numbers), `runner` (shared trainings and evaluations,
per-cell records), `estimate` (time from measured throughputs), `report` and `figures`
(ours | paper | difference), `run` (the whole command), `demo` (generated data, tiny models).
"""
