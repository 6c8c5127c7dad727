# Training loss (line, metrics.csv) and validation loss (points, eval.csv) against the tokens of each stage, one panel per model
# Data: the .dat files beside this script. Redraw: gnuplot loss-stages.gp
if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) {
  set terminal pngcairo noenhanced size 1260,990 font 'sans,9'
} else {
  set terminal png noenhanced size 1260,990
}
set output 'loss-stages.png'
set multiplot layout 3,3
set grid
set key below font ',8'
set xlabel 'tokens of the stage'
set ylabel 'loss (nats/token)'
set format x '%.1s%c'
set offsets graph 0.03, graph 0.03, graph 0.05, graph 0.05
set title 'seed'
plot 'loss-train.dat' index 0 using 1:2 with lines lw 2 lc rgb '#333333' title 'training', \
     'loss-valid.dat' index 0 using 1:(strcol(2) eq 'general' ? $3 : NaN) with points pt 7 ps 1.1 lc 1 title 'validation general', \
     'loss-valid.dat' index 0 using 1:(strcol(2) eq 'code' ? $3 : NaN) with points pt 7 ps 1.1 lc 2 title 'validation code', \
     'loss-valid.dat' index 0 using 1:(strcol(2) eq 'legal' ? $3 : NaN) with points pt 7 ps 1.1 lc 3 title 'validation legal', \
     'loss-valid.dat' index 0 using 1:(strcol(2) eq 'math' ? $3 : NaN) with points pt 7 ps 1.1 lc 4 title 'validation math', \
     'loss-valid.dat' index 0 using 1:(strcol(2) eq 'reference' ? $3 : NaN) with points pt 7 ps 1.1 lc 5 title 'validation reference'
set title 'expert-code'
plot 'loss-train.dat' index 1 using 1:2 with lines lw 2 lc rgb '#333333' title 'training', \
     'loss-valid.dat' index 1 using 1:(strcol(2) eq 'general' ? $3 : NaN) with points pt 7 ps 1.1 lc 1 title 'validation general', \
     'loss-valid.dat' index 1 using 1:(strcol(2) eq 'code' ? $3 : NaN) with points pt 7 ps 1.1 lc 2 title 'validation code', \
     'loss-valid.dat' index 1 using 1:(strcol(2) eq 'legal' ? $3 : NaN) with points pt 7 ps 1.1 lc 3 title 'validation legal', \
     'loss-valid.dat' index 1 using 1:(strcol(2) eq 'math' ? $3 : NaN) with points pt 7 ps 1.1 lc 4 title 'validation math', \
     'loss-valid.dat' index 1 using 1:(strcol(2) eq 'reference' ? $3 : NaN) with points pt 7 ps 1.1 lc 5 title 'validation reference'
set title 'expert-legal'
plot 'loss-train.dat' index 2 using 1:2 with lines lw 2 lc rgb '#333333' title 'training', \
     'loss-valid.dat' index 2 using 1:(strcol(2) eq 'general' ? $3 : NaN) with points pt 7 ps 1.1 lc 1 title 'validation general', \
     'loss-valid.dat' index 2 using 1:(strcol(2) eq 'code' ? $3 : NaN) with points pt 7 ps 1.1 lc 2 title 'validation code', \
     'loss-valid.dat' index 2 using 1:(strcol(2) eq 'legal' ? $3 : NaN) with points pt 7 ps 1.1 lc 3 title 'validation legal', \
     'loss-valid.dat' index 2 using 1:(strcol(2) eq 'math' ? $3 : NaN) with points pt 7 ps 1.1 lc 4 title 'validation math', \
     'loss-valid.dat' index 2 using 1:(strcol(2) eq 'reference' ? $3 : NaN) with points pt 7 ps 1.1 lc 5 title 'validation reference'
set title 'expert-math'
plot 'loss-train.dat' index 3 using 1:2 with lines lw 2 lc rgb '#333333' title 'training', \
     'loss-valid.dat' index 3 using 1:(strcol(2) eq 'general' ? $3 : NaN) with points pt 7 ps 1.1 lc 1 title 'validation general', \
     'loss-valid.dat' index 3 using 1:(strcol(2) eq 'code' ? $3 : NaN) with points pt 7 ps 1.1 lc 2 title 'validation code', \
     'loss-valid.dat' index 3 using 1:(strcol(2) eq 'legal' ? $3 : NaN) with points pt 7 ps 1.1 lc 3 title 'validation legal', \
     'loss-valid.dat' index 3 using 1:(strcol(2) eq 'math' ? $3 : NaN) with points pt 7 ps 1.1 lc 4 title 'validation math', \
     'loss-valid.dat' index 3 using 1:(strcol(2) eq 'reference' ? $3 : NaN) with points pt 7 ps 1.1 lc 5 title 'validation reference'
set title 'btx-dm'
plot 'loss-train.dat' index 4 using 1:2 with lines lw 2 lc rgb '#333333' title 'training', \
     'loss-valid.dat' index 4 using 1:(strcol(2) eq 'general' ? $3 : NaN) with points pt 7 ps 1.1 lc 1 title 'validation general', \
     'loss-valid.dat' index 4 using 1:(strcol(2) eq 'code' ? $3 : NaN) with points pt 7 ps 1.1 lc 2 title 'validation code', \
     'loss-valid.dat' index 4 using 1:(strcol(2) eq 'legal' ? $3 : NaN) with points pt 7 ps 1.1 lc 3 title 'validation legal', \
     'loss-valid.dat' index 4 using 1:(strcol(2) eq 'math' ? $3 : NaN) with points pt 7 ps 1.1 lc 4 title 'validation math', \
     'loss-valid.dat' index 4 using 1:(strcol(2) eq 'reference' ? $3 : NaN) with points pt 7 ps 1.1 lc 5 title 'validation reference'
set title 'bam-dm'
plot 'loss-train.dat' index 5 using 1:2 with lines lw 2 lc rgb '#333333' title 'training', \
     'loss-valid.dat' index 5 using 1:(strcol(2) eq 'general' ? $3 : NaN) with points pt 7 ps 1.1 lc 1 title 'validation general', \
     'loss-valid.dat' index 5 using 1:(strcol(2) eq 'code' ? $3 : NaN) with points pt 7 ps 1.1 lc 2 title 'validation code', \
     'loss-valid.dat' index 5 using 1:(strcol(2) eq 'legal' ? $3 : NaN) with points pt 7 ps 1.1 lc 3 title 'validation legal', \
     'loss-valid.dat' index 5 using 1:(strcol(2) eq 'math' ? $3 : NaN) with points pt 7 ps 1.1 lc 4 title 'validation math', \
     'loss-valid.dat' index 5 using 1:(strcol(2) eq 'reference' ? $3 : NaN) with points pt 7 ps 1.1 lc 5 title 'validation reference'
set title 'bam-cm'
plot 'loss-train.dat' index 6 using 1:2 with lines lw 2 lc rgb '#333333' title 'training', \
     'loss-valid.dat' index 6 using 1:(strcol(2) eq 'general' ? $3 : NaN) with points pt 7 ps 1.1 lc 1 title 'validation general', \
     'loss-valid.dat' index 6 using 1:(strcol(2) eq 'code' ? $3 : NaN) with points pt 7 ps 1.1 lc 2 title 'validation code', \
     'loss-valid.dat' index 6 using 1:(strcol(2) eq 'legal' ? $3 : NaN) with points pt 7 ps 1.1 lc 3 title 'validation legal', \
     'loss-valid.dat' index 6 using 1:(strcol(2) eq 'math' ? $3 : NaN) with points pt 7 ps 1.1 lc 4 title 'validation math', \
     'loss-valid.dat' index 6 using 1:(strcol(2) eq 'reference' ? $3 : NaN) with points pt 7 ps 1.1 lc 5 title 'validation reference'
set title 'bam-shared-kv-dm'
plot 'loss-train.dat' index 7 using 1:2 with lines lw 2 lc rgb '#333333' title 'training', \
     'loss-valid.dat' index 7 using 1:(strcol(2) eq 'general' ? $3 : NaN) with points pt 7 ps 1.1 lc 1 title 'validation general', \
     'loss-valid.dat' index 7 using 1:(strcol(2) eq 'code' ? $3 : NaN) with points pt 7 ps 1.1 lc 2 title 'validation code', \
     'loss-valid.dat' index 7 using 1:(strcol(2) eq 'legal' ? $3 : NaN) with points pt 7 ps 1.1 lc 3 title 'validation legal', \
     'loss-valid.dat' index 7 using 1:(strcol(2) eq 'math' ? $3 : NaN) with points pt 7 ps 1.1 lc 4 title 'validation math', \
     'loss-valid.dat' index 7 using 1:(strcol(2) eq 'reference' ? $3 : NaN) with points pt 7 ps 1.1 lc 5 title 'validation reference'
set title 'bam-shared-kv-cm'
plot 'loss-train.dat' index 8 using 1:2 with lines lw 2 lc rgb '#333333' title 'training', \
     'loss-valid.dat' index 8 using 1:(strcol(2) eq 'general' ? $3 : NaN) with points pt 7 ps 1.1 lc 1 title 'validation general', \
     'loss-valid.dat' index 8 using 1:(strcol(2) eq 'code' ? $3 : NaN) with points pt 7 ps 1.1 lc 2 title 'validation code', \
     'loss-valid.dat' index 8 using 1:(strcol(2) eq 'legal' ? $3 : NaN) with points pt 7 ps 1.1 lc 3 title 'validation legal', \
     'loss-valid.dat' index 8 using 1:(strcol(2) eq 'math' ? $3 : NaN) with points pt 7 ps 1.1 lc 4 title 'validation math', \
     'loss-valid.dat' index 8 using 1:(strcol(2) eq 'reference' ? $3 : NaN) with points pt 7 ps 1.1 lc 5 title 'validation reference'
unset multiplot
