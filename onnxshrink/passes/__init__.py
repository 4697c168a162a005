"""Graph passes that are not quantization or pruning themselves: preparation and clean-up."""
