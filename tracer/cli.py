import click


@click.group()
def main() -> None:
    """gputrace: why was a process denied a GPU?"""
