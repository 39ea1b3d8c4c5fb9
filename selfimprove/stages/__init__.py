"""The method library: stages that several methods share (task prompts and kept data, two-turn
episodes, preference pairs, held-out evaluation, exploration/exploitation monitoring). A stage
that serves one method only lives with it, under methods/<method>/."""
