"""MiniLM-L6 on SST-2 dev: fp32 vs integer-only INT8 accuracy and embedding cosine.

Same as ``python -m intq.demo`` (see ``intq/demo.py`` for the data, the
preprocessing and the probe); kept here so every benchmark lives under
``benchmarks/``.

    python benchmarks/sst2_accuracy.py [--limit N] [--calib 256] [--calibration percentile]
"""

from intq.demo import main

if __name__ == "__main__":
    main()
