"""Privacy evaluation: what a curious server or peer can recover, and the defenses against it."""
