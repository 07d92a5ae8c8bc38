"""What `diffsim.render` draws with: a scene per env (`scenes`: MuJoCo's renderer for Brax
and Playground bodies, matplotlib for the toy envs) and the figure of an episode's signals
for every other env (`episode_plot`)."""
