"""Model code and conversions chattune owns for families transformers lacks or cannot load."""
