"""``vaelab serve``: a local web page to explore the KL term and a trained model."""
