"""Map-style sources over data on disk, read in the workers: ``len(src)`` samples, ``src[i]`` read by index.

* ``Files(paths, load=None)`` -- one file per sample (``files.py``);
* ``TarShards(paths)`` -- WebDataset tar shards (``tar.py``, indexed by ``tarindex.py``);
* ``ParquetRows(paths, columns=None)`` -- the rows of Parquet files (``parquet.py``; needs pyarrow);
* ``NpyShards(paths)`` -- ``.npy`` files as one array along their first axis (``npy.py``).

Each is built once from the shards' headers or footers and pickles small (paths and index arrays), so
ordering, resume and sharding need nothing beyond ``src[i]``. Open files are per process (``_shards``).
See docs/design.md, "Readers".
"""

from .files import Files
from .npy import NpyShards
from .parquet import ParquetRows
from .tar import TarShards

__all__ = ["Files", "NpyShards", "ParquetRows", "TarShards"]
