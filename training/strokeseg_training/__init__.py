"""StrokeSeg training: recipes, dataset adapters, train / evaluate / tune / export."""
