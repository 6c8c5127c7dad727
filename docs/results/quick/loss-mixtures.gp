# Training loss of every mixture run against tokens (left) and training FLOPs (right)
# Data: the .dat files beside this script. Redraw: gnuplot loss-mixtures.gp
if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) {
  set terminal pngcairo noenhanced size 1100,460 font 'sans,9'
} else {
  set terminal png noenhanced size 1100,460
}
set output 'loss-mixtures.png'
set multiplot layout 1,2
set grid
set key below font ',8'
set format x '%.1s%c'
set ylabel 'training loss (nats/token)'
set offsets graph 0.03, graph 0.03, graph 0.05, graph 0.05
set title 'against tokens'
set xlabel 'tokens of the stage'
plot 'loss-train.dat' index 4 using 1:2 with linespoints lw 2 dt 1 pt 7 lc rgb '#444444' title 'btx-dm', \
     'loss-train.dat' index 5 using 1:2 with linespoints lw 2 dt 1 pt 7 lc rgb '#1f77b4' title 'bam-dm', \
     'loss-train.dat' index 6 using 1:2 with linespoints lw 2 dt 2 pt 6 lc rgb '#1f77b4' title 'bam-cm', \
     'loss-train.dat' index 7 using 1:2 with linespoints lw 2 dt 1 pt 7 lc rgb '#d62728' title 'bam-shared-kv-dm', \
     'loss-train.dat' index 8 using 1:2 with linespoints lw 2 dt 2 pt 6 lc rgb '#d62728' title 'bam-shared-kv-cm'
set title 'against training FLOPs (3 x forward)'
set xlabel 'training FLOPs'
plot 'loss-train.dat' index 4 using 3:2 with linespoints lw 2 dt 1 pt 7 lc rgb '#444444' title 'btx-dm', \
     'loss-train.dat' index 5 using 3:2 with linespoints lw 2 dt 1 pt 7 lc rgb '#1f77b4' title 'bam-dm', \
     'loss-train.dat' index 6 using 3:2 with linespoints lw 2 dt 2 pt 6 lc rgb '#1f77b4' title 'bam-cm', \
     'loss-train.dat' index 7 using 3:2 with linespoints lw 2 dt 1 pt 7 lc rgb '#d62728' title 'bam-shared-kv-dm', \
     'loss-train.dat' index 8 using 3:2 with linespoints lw 2 dt 2 pt 6 lc rgb '#d62728' title 'bam-shared-kv-cm'
unset multiplot
