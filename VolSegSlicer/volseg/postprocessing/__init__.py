"""The way back: probabilities to a clean label map on the input grid."""
