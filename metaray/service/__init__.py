"""What runs beside training: the adaptation service and Ray Job submission."""
