"""Driving Flower simulations: the `fedlora` console script and the private-SuperLink runner."""
