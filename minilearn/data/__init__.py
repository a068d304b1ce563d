"""Data: datasets, DataBunch, item lists, transforms, downloads and standard formats."""
