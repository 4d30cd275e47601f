"""`modkern demo`: tiny local models, two specialists, and every way of combining them."""
