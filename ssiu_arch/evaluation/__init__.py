"""Evaluation: benchmark results, published numbers and the pieces ``ssiu results`` builds its tables from.

* :mod:`.metrics_schema`: the ``metrics_<dataset>.json`` files SSIUModel writes and ``ssiu results`` reads.
* :mod:`.datasets`: benchmark names and EDSR-style benchmark folders.
* :mod:`.published`: the published-results table (``ssiu_arch/data/published_results.csv``).
* :mod:`.table`: table rows, from published numbers or from metrics files.
* :mod:`.bench_table`: ``ssiu bench --json`` rows merged into the table.
* :mod:`.bicubic`: the bicubic baseline measured with BasicSR's metrics.
* :mod:`.published_ssim`: the published SSIU evaluation's SSIM, re-implemented to measure its inflation.
* :mod:`.render`: markdown, CSV and plot output.

Importing these modules does not import basicsr; the functions that compute metrics do.
"""
