"""Files: the lazy reader, the atomic writer, the one builder of output metadata, exact output sizing from shapes
alone, and the storage (local folders or fsspec URLs) that batch reads and writes."""
