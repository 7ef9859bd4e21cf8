"""Graph passes over ``torch.export`` programs."""
