"""Speech data: manifests, audio io, filters, vectorization, merge, packed datasets."""
